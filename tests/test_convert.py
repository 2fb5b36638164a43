"""Checkpoint export and import: HF -> JAX -> HF round trip, our Orbax model directory, and a trained run's export
checked by an independent PyTorch computation of the RoI map and gate probability."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_mod

from qzoom_jax import convert, infer, train
from qzoom_jax.labelling import gate_labels, teacher
from qzoom_jax.checkpoints import embedded, hf_export
from qzoom_jax.checkpoints import hf_checkpoint as hc
from qzoom_jax.data.processor import Processor
from qzoom_jax.checkpoints.hf_export import export_params
from qzoom_jax.checkpoints.embedded import EMBEDDED_DEFAULT
from qzoom_jax.checkpoints.pretrained import load_pretrained
from qzoom_jax.zoom.engine import QZoom
from qzoom_jax.models.qzoom import gate, twig
from tests.test_checkpoint_safety import fake_run
from tests.test_gate_train import gate_config
from tests.test_train import sdrpn_config


def read_json(*parts) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def hf_tensors(directory) -> dict:
    """Every tensor of an HF directory (single file or sharded), by name, as numpy."""
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(read_json(index)["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for name in files:
        out.update(load_file(os.path.join(directory, name)))
    return out


def test_hf_to_jax_to_hf_is_bit_identical_and_loads_in_transformers(tmp_path):
    model = load_pretrained(None)
    out = export_params(model.params, model.config, tmp_path, dtype="float32", max_shard_bytes=2_000_000,
                        files_from=EMBEDDED_DEFAULT)
    index = read_json(out, "model.safetensors.index.json")
    source, exported = hf_tensors(EMBEDDED_DEFAULT), hf_tensors(out)
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(source)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in source.values())
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype and np.array_equal(exported[key], tensor), key
    assert os.path.exists(os.path.join(out, "tokenizer.json")) and os.path.exists(
        os.path.join(out, "preprocessor_config.json"))

    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    proc = Processor.from_pretrained(EMBEDDED_DEFAULT)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (336, 448, 3), np.uint8))
    inputs = proc(images=[image], text=[text])
    ours = model.logits(**inputs)
    with torch.no_grad():
        ref = hf.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"export -> transformers: max |dlogits| / max |logits| = {err:.2e}")
    assert err < 1e-4


def test_bf16_export_and_the_orbax_model_directory(tmp_path):
    bf16 = export_params(load_pretrained(None).params, load_pretrained(None).config, tmp_path / "bf16")
    assert read_json(bf16, "config.json")["torch_dtype"] == "bfloat16"
    assert str(hf_tensors(bf16)["model.norm.weight"].dtype) == "bfloat16"

    orbax_dir = convert.main(["--from-hf", embedded.EMBEDDED_QZOOM, "--out", str(tmp_path / "jax"),
                              "--dtype", "float32"])
    assert os.path.isdir(os.path.join(orbax_dir, "params")) and os.path.exists(os.path.join(orbax_dir, "tokenizer.json"))
    got, want = load_pretrained(orbax_dir), load_pretrained(embedded.EMBEDDED_QZOOM)
    assert "twig_layers" in got.params["model"] and "high_res_head" in got.params["model"]
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    args = {"min_pixels": 50176, "max_pixels": 50176, "roi_threshold": 0.1, "gate_threshold": 0.0,
            "max_new_tokens": 4}
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), np.uint8))
    a, b = (QZoom.load(p).answer([image], ["Where?"], **args)[0] for p in (orbax_dir, None))
    assert (a.answer, a.box, a.gate_prob) == (b.answer, b.box, b.gate_prob)


# ---- a trained run's export, checked with PyTorch ------------------------------------------------------
K, T, SIDE = 3, 3, 448  # the image is 16x16 merged tokens (448 px) at a 200704-pixel budget


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two short runs on the embedded default (stage 1, then stage 3 naming it), exported in float32."""
    root = tmp_path_factory.mktemp("runs")
    sd = sdrpn_config()
    sd.train.num_steps = 2
    sd.data.label_dirs = tuple(teacher.generate_labels(sd.teacher, str(root / "labels")))
    train.main(sd, str(root / "sdrpn"))
    gate = gate_config()
    gate.train.num_steps = 2
    gate.data.label_dirs = tuple(gate_labels.generate_answers(gate.answers, str(root / "answers")))
    gate.model.twig_run = str(root / "sdrpn")
    train.main(gate, str(root / "gate"))
    return convert.main(["--from-run", str(root / "gate"), "--out", str(root / "hf"), "--dtype", "float32",
                         "--max-shard-size", "4MB"])


def test_exported_run_holds_the_branches_under_upstreams_names(exported):
    tensors, d = hf_tensors(exported), 128
    config = read_json(exported, "config.json")
    assert {k: config[k] for k in ("enable_twig", "twig_K", "twig_T", "enable_high_res", "high_res_K", "high_res_T",
                                   "roi_source", "roi_enable2stage")} == {
        "enable_twig": True, "twig_K": K, "twig_T": T, "enable_high_res": True, "high_res_K": K, "high_res_T": T,
        "roi_source": "qk", "roi_enable2stage": True}
    for stack in ("twig_layers", "high_res_layers"):
        for i in range(T):
            assert tensors[f"model.{stack}.{i}.self_attn.q_proj.weight"].shape == (d, d)
            assert tensors[f"model.{stack}.{i}.self_attn.k_proj.bias"].shape == (64,)
            assert tensors[f"model.{stack}.{i}.mlp.down_proj.weight"].shape == (d, 384)
    assert tensors["model.high_res_head.weight"].shape == (1, d) and tensors["model.high_res_head.bias"].shape == (1,)
    # The backbone is the frozen embedded default, unchanged.
    base = hf_tensors(EMBEDDED_DEFAULT)
    assert all(np.array_equal(tensors[k], v) for k, v in base.items())


def torch_reference(directory, image, question):
    """RoI logits [16, 16] and gate probability from the exported tensors with transformers modules only."""
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_torch(os.path.join(directory, name)))
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    vision = transformers.AutoImageProcessor.from_pretrained(directory).preprocess(
        [image], size={"shortest_edge": SIDE * SIDE, "longest_edge": SIDE * SIDE}, return_tensors="pt")
    n = int(vision["image_grid_thw"].prod()) // 4
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n + f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)["input_ids"]])
    t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": vision["pixel_values"],
         "image_grid_thw": vision["image_grid_thw"], "mm_token_type_ids": (ids == hf.config.image_token_id).long()}

    def layers(prefix, count):
        out = []
        for i in range(count):
            layer = hf_mod.Qwen2_5_VLDecoderLayer(hf.config.text_config, K + i).eval()
            sd = {k[len(f"{prefix}.{i}."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}.{i}.")}
            layer.load_state_dict(sd)
            out.append(layer)
        return out

    with torch.no_grad():
        h_k = hf(**t, output_hidden_states=True).hidden_states[K]
        lm = hf.model.language_model
        pos, _ = hf.model.get_rope_index(ids, t["mm_token_type_ids"], t["image_grid_thw"],
                                         attention_mask=t["attention_mask"])
        cos, sin = lm.rotary_emb(h_k, pos)
        mask = create_causal_mask(config=lm.config, inputs_embeds=h_k, attention_mask=t["attention_mask"],
                                  past_key_values=None, allow_is_causal_skip=False)
        twig = layers("model.twig_layers", T)
        x = h_k
        for layer in twig[:-1]:
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        attn = twig[-1].self_attn
        xn = twig[-1].input_layernorm(x)
        q = attn.q_proj(xn).view(1, xn.shape[1], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(xn).view(1, xn.shape[1], -1, attn.head_dim).transpose(1, 2)
        q, k = hf_mod.apply_rotary_pos_emb(q, k, cos, sin)
        k = hf_mod.repeat_kv(k, attn.num_key_value_groups)
        scores = (torch.einsum("hd,hld->hl", q[0, :, -1], k[0]) / attn.head_dim ** 0.5).mean(0)
        roi = scores[ids[0] == hf.config.image_token_id].numpy().reshape(16, 16)
        g = h_k
        for layer in layers("model.high_res_layers", T):
            g = layer(g, attention_mask=mask, position_embeddings=(cos, sin))
        logit = g[0, -1] @ tensors["model.high_res_head.weight"][0] + tensors["model.high_res_head.bias"][0]
    return roi, float(torch.sigmoid(logit))


def test_export_matches_infer_json_by_an_independent_pytorch_computation(exported, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (SIDE, SIDE, 3), np.uint8))
    path = str(tmp_path / "image.png")
    image.save(path)
    question = "Which shape is drawn in red?"
    out = infer.main(["--checkpoint", exported, "--image", path, "--question", question, "--json", "--dtype",
                      "float32", "--attn-impl", "einsum", "--min-pixels", str(SIDE * SIDE), "--max-pixels",
                      str(SIDE * SIDE), "--max-new-tokens", "1"])
    capsys.readouterr()
    roi, gate = torch_reference(exported, image, question)
    got = np.array(out["roi_logits"])
    err = np.abs(got - roi).max()
    print(f"RoI map: max |d| = {err:.2e} (map range {roi.min():.2f}..{roi.max():.2f}); gate {out['gate_prob']:.6f} "
          f"vs {gate:.6f}")
    assert got.shape == (16, 16) and err < 1e-4 and roi.std() > 0.01
    assert out["gate_prob"] == pytest.approx(gate, abs=1e-5)


# ---- errors, and the output replaced whole or not at all -----------------------------------------------
def _fails(main, argv, capsys) -> str:
    """What ``main(argv)`` prints on stderr as it exits with status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    missing, out = str(tmp_path / "no_run"), str(tmp_path / "out")
    assert _fails(convert.main, ["--from-run", missing, "--out", out], capsys) == (
        f"error: no checkpoint at {missing} (expected a model directory or a training run)\n")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(EMBEDDED_DEFAULT, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 3)
    assert _fails(convert.main, ["--from-hf", str(corrupt), "--out", out], capsys) == (
        f"error: {corrupt}/model.safetensors: not a valid safetensors file (header length 16777215 does not fit a "
        "3-byte file)\n")
    assert sorted(os.listdir(tmp_path)) == ["corrupt"]
    # --out may only be replaced whole when that cannot destroy anything: not a source, not some other directory.
    assert _fails(convert.main, ["--from-hf", str(corrupt), "--out", str(corrupt)], capsys) == (
        f"error: --out {corrupt} would replace {corrupt}, which this conversion reads\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert _fails(convert.main, ["--from-hf", EMBEDDED_DEFAULT, "--out", str(tmp_path / "notes")], capsys) == (
        f"error: --out {tmp_path}/notes exists and is not a model directory (no config.json); not replacing it\n")
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    with pytest.raises(hc.CheckpointError):  # --verbosity 1: the exception itself, for its traceback
        convert.main(["--from-run", missing, "--out", out, "--verbosity", "1"])


def test_from_hf_replaces_the_output_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "jax")
    convert.main(["--from-hf", EMBEDDED_DEFAULT, "--out", out, "--dtype", "float32"])
    old = load_pretrained(out).params

    def disk_full(*args):  # the last step of the writer: the params are already written
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(hf_export, "copy_processor_files", disk_full)
        with pytest.raises(OSError, match="disk full"):
            convert.main(["--from-hf", embedded.EMBEDDED_QZOOM, "--out", out, "--dtype", "float32"])
    assert os.listdir(tmp_path) == ["jax"]  # no partial directory left beside it
    jax.tree.map(np.testing.assert_array_equal, load_pretrained(out).params, old)  # the old weights, whole

    convert.main(["--from-hf", embedded.EMBEDDED_QZOOM, "--out", out, "--dtype", "float32"])
    assert os.listdir(tmp_path) == ["jax"] and "twig_layers" in load_pretrained(out).params["model"]


def test_from_run_replaces_the_output_whole_or_not_at_all(tmp_path, monkeypatch):
    layers = load_pretrained(None).params["model"]["layers"]
    sdrpn = fake_run(tmp_path / "sdrpn", twig.init_twig_params(layers, K, 2))
    gate_run = fake_run(tmp_path / "gate", gate.init_gate_params(layers, K, 2, jax.random.key(0)), stage="gate",
                        twig_run=sdrpn)
    out = str(tmp_path / "hf")
    common = ["--out", out, "--dtype", "float32", "--max-shard-size", "4MB"]
    convert.main(["--from-run", sdrpn, *common])  # twig only
    old = hf_tensors(out)
    write_shard = hf_export._write_shard

    def fails_after_one_shard(out_dir, i, tensors):
        if i > 1:
            raise OSError("disk full")
        return write_shard(out_dir, i, tensors)

    with monkeypatch.context() as m:
        m.setattr(hf_export, "_write_shard", fails_after_one_shard)
        with pytest.raises(OSError, match="disk full"):
            convert.main(["--from-run", gate_run, *common])
    assert sorted(os.listdir(tmp_path)) == ["gate", "hf", "sdrpn"]  # no partial directory left beside it
    now = hf_tensors(out)
    assert now.keys() == old.keys() and all(np.array_equal(now[k], v) for k, v in old.items())

    convert.main(["--from-run", gate_run, *common])
    assert sorted(os.listdir(tmp_path)) == ["gate", "hf", "sdrpn"]
    assert set(hf_tensors(out)) == set(old) | {"model.high_res_head.weight", "model.high_res_head.bias"} | {
        k.replace("twig_layers", "high_res_layers") for k in old if "twig_layers" in k}


def test_a_killed_conversion_leaves_a_complete_output(tmp_path):
    """kill -9 while the new output is being written: --out is the old complete output (or, had the writer
    already finished, the new complete one), never a mix; the partial one is only under its temporary name."""
    out = tmp_path / "jax"
    convert.main(["--from-hf", EMBEDDED_DEFAULT, "--out", str(out), "--dtype", "float32"])
    old = load_pretrained(out).params
    proc = subprocess.Popen([sys.executable, "-m", "qzoom_jax.convert", "--from-hf", embedded.EMBEDDED_QZOOM,
                             "--out", str(out), "--dtype", "float32"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = tmp_path / f"jax.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    got = load_pretrained(out).params
    if "twig_layers" in got["model"]:  # finished before the kill
        assert os.listdir(tmp_path) == ["jax"]
    else:
        jax.tree.map(np.testing.assert_array_equal, got, old)
        assert sorted(os.listdir(tmp_path)) == ["jax", partial.name]
