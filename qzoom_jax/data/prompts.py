"""Prompt strings of the Q-Zoom data pipeline (training reference §1.1-§1.4), shared by every stage."""

# The inference prompt's system turn: Qwen2.5-VL's chat template writes it by default; Qwen3-VL's has no default
# system turn, so upstream's Qwen3-VL evaluation inserts this one (model-and-inference reference §6).
SYSTEM_PROMPT = "You are a helpful assistant."

# Ends most LLaVA GQA/OCR-VQA prompts; the answer suffix of the short-answer prompts.
ANSWER_SUFFIX = "Answer the question using a single word or phrase."

# Natural-mode teacher prompts ask for boxes; the attention of the box tokens is the teacher signal (§1.2 step 2).
GROUNDING_INSTRUCTION = (
    "Output the grounding bounding box of Region of Interest for the question. IMPORTANT: The output MUST be "
    "raw text, one box per line. DO NOT use JSON. Follow this exact format: x_min y_min x_max y_max "
    "{detail_label}."
)

# Older released pickles carry this instruction in `prompt`; the training dataset swaps it for ANSWER_SUFFIX.
LEGACY_GROUNDING_INSTRUCTION = "Output grounding bounding box related to the question in JSON."

# Follows the "(A) text" option lines of a multiple-choice evaluation question (LLaVA's wording).
OPTION_INSTRUCTION = "Answer with the option's letter from the given choices directly."
