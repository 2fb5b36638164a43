"""String normalisation shared by the scorers: the fork's TextVQA answer processor and a plain edit distance.

Section numbers (§) refer to /work/shared/reference/lmms-eval-tasks.md, which describes upstream's lmms-eval fork.
"""

from __future__ import annotations

import re

# ---- TextVQA answer processor (ref §2.1) --------------------------------------------------------------------

# ref §2.1 step 4: whole tokens only, and only up to ten; "none" counts as zero.
_NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
    """The processor's contraction table (ref §2.1 step 4): it maps a form that lacks ONE apostrophe to the full
    form ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"; never both missing). Entries
    that lowercase tokens can never hit are left out: the capitalised keys "Im", "Ive", "Id've", "I'dve", and
    the keys holding "'s" (step 1 has already split "'s" off, so "let's", "she's", "ow's'at" never reach it).
    That is why "im", "lets" and "shes" stay as they are. One key goes the other way, added at the end."""
    full_forms = (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
        "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
        "mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
        "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
        "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
        "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
        "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't "
        "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
    ).split()
    table = {}
    for full in full_forms:
        cuts = [i for i, ch in enumerate(full) if ch == "'"]
        for i in cuts:
            table[full[:i] + full[i + 1:]] = full
    table["somebody'd"] = "somebodyd"  # ref §2.1: the one key that removes the apostrophe
    return table


_CONTRACTIONS = _contraction_table()
# ref §2.1 step 3: these 21 characters, in this order; ' : $ % # & * ~ ^ | are kept.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
# ref §2.1 step 3: the fork's period pattern has a typo'd lookbehind that never blocks, so it is this one.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # ref §2.1: the fork passes re.UNICODE (== 32) as the `count` of re.sub


def normalize_vqa_answer(text: str) -> str:
    """The fork's EvalAI answer processor, applied to the prediction and to every human answer (ref §2.1)."""
    # step 1: word_tokenize; every comma and question mark goes, so the digit-comma rule can never fire
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    # step 2
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # step 3: whether p touches a space is decided on the step-3 input, then all of p go (or become spaces)
    out = text
    for p in _PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_LIMIT)
    # step 4: numbers, then articles, then contractions
    words = [_NUMBER_MAP.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


# ---- edit distance (ANLS, ref §2.2) ---------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Character edit distance with unit costs for insertion, deletion and substitution (ref §2.2 step 2)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def collapse_whitespace(text: str) -> str:
    """Lower case, then runs of whitespace as one space, none at the ends (ref §2.2 step 1)."""
    return " ".join(text.lower().split())
