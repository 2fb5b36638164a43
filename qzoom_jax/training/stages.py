"""What differs between the training stages ``qzoom_jax.train`` runs; ``get(cfg)`` picks one by ``cfg.stage``.

A stage says where its labels come from and which records train, how its trainable params start
(``trainable(backbone) -> (params, frozen)``: a new head beside the whole frozen backbone, or -- SFT -- a subset
split off the backbone), how a record becomes a fixed-shape example, its objective (``loss_fn(params, frozen,
config, batch, layout, K, *, threshold, attn_impl)``), the metrics on the progress bar and what its checkpoints
record. Everything else -- mesh, frozen backbone, optimizer, compiled step, loop, checkpoints, metrics -- is
the same story in ``train.main``.
"""

from __future__ import annotations

import functools
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from qzoom_jax.runtime import distributed, parallel
from qzoom_jax.runtime.errors import ConfigError
from qzoom_jax.labelling import gate_labels
from qzoom_jax.training import gate_objective, post_sft, qmop_stage, sdrpn, sft
from qzoom_jax.training import step as step_lib
from qzoom_jax.labelling import teacher
from qzoom_jax.training.checkpoint import TrainCheckpointer
from qzoom_jax.checkpoints import qzoom_checkpoint
from qzoom_jax.data import conversations, packing, stage1, stage3, tfds_datasets, tfds_sft, tfds_stage3
from qzoom_jax.labelling import parts as label_parts
from qzoom_jax.models import attention, param_axes, vlm
from qzoom_jax.models.qzoom import gate as gate_lib
from qzoom_jax.models.qzoom import twig as twig_lib
from qzoom_jax.models import registry


def _dataset_name(prefix: str, path: str) -> str:
    return prefix + "".join(c if c.isalnum() else "_" for c in os.path.basename(path)).lower()


def _label_dirs(data, workdir: str, build_pickle, prefix: str, generate) -> list[str]:
    """The stage's label datasets: ``data.label_dirs`` as given, else ``data.pickle`` (upstream's file) converted
    once into the workdir by ``build_pickle`` (process 0 first), else ``generate()`` (a label run)."""
    if data.label_dirs:
        return list(data.label_dirs)
    if data.pickle:
        build = lambda: build_pickle(data.pickle, os.path.join(workdir, "data"), _dataset_name(prefix, data.pickle),
                                     data.image_root or None)
        return [distributed.main_process_first(build, f"{prefix}pickle")]
    return generate()


def _label_run(cfg_labels, backbone_path):
    """The run's label-generation config, resolved (the run's config itself is never mutated); it labels with
    the frozen backbone being extended unless it names another model."""
    resolved = cfg_labels.copy_and_resolve_references()
    if not resolved.model.path:
        resolved.model.path = backbone_path
    return resolved


class _Head:
    """A Q-Zoom head: T new decoder layers (+ head) branching off base layer K; the whole backbone is frozen."""

    branches = True  # model.K / model.T name the branch point (checked by train.main)
    master_dtype = "float32"

    def trainable(self, backbone):
        m = self.cfg.model
        return self.init_params(backbone["model"]["layers"], m.K, m.T), backbone

    def bucket_of(self, processor, config) -> None:
        """None: every example has the same shapes (one compiled step)."""
        del processor, config


class Sdrpn(_Head):
    """Stage 1 -- SD-RPN: the twig learns the frozen teacher's RoI map (training reference §1)."""

    name = "sdrpn"
    loss_fn = staticmethod(sdrpn.loss_fn)
    progress: ClassVar[dict[str, str]] = {"loss": "loss", "iou": "roi_iou"}  # progress-bar label -> metric
    annotate = False  # examples need no (epoch, index)
    accum_weight = "labelled_cells"  # gradient accumulation weights micro-batches by their labelled cells

    def __init__(self, cfg):
        self.cfg = cfg
        self.threshold = cfg.train.roi_threshold

    def training_source(self, workdir: str):
        """(random-access records, checkpoint meta): given label datasets, an upstream pickle converted once, or
        a teacher run in the workdir."""
        label_dirs = _label_dirs(self.cfg.data, workdir, tfds_datasets.build_pickle_labels, "pickle_",
                                 lambda: teacher.generate_labels(_label_run(self.cfg.teacher, self.cfg.model.path),
                                                                    workdir))
        source = tfds_datasets.open_source(label_dirs)
        grid, shape = self.cfg.data.grid, source[0]["grounding_attn"].shape
        if shape != (grid, grid):  # every example would be refused, after the backbone is loaded and compiled
            raise ConfigError(f"data.grid={grid} does not match the labels: their maps are {shape[0]}x{shape[1]} "
                              f"({label_dirs[0]}); set --config.data.grid={shape[0]}")
        n = self.cfg.data.get("roi_samples", 0)
        if n and len(source) > n:  # upstream's roi_samples: a seed-42 shuffle, then the first n (stage 2.5)
            source = _Subset(source, stage3.select_pool(["hard"] * len(source), 42, n))
        return source, {"label_dirs": label_dirs}

    def init_params(self, base_layers, K: int, T: int):
        return twig_lib.init_twig_params(base_layers, K, T)

    def trainable(self, backbone):
        """The twig beside the frozen backbone (the branches of a Q-Zoom ``model.path`` set aside): copies of
        base layers K..K+T-1, or with ``model.twig_init`` (stage 2.5) the stage-1 twig it names."""
        m = self.cfg.model
        model = {k: v for k, v in backbone["model"].items()
                 if k not in ("twig_layers", "high_res_layers", "high_res_head")}
        init = m.get("twig_init", "")
        if not init:
            return self.init_params(model["layers"], m.K, m.T), {**backbone, "model": model}
        if init == "model":
            twig, where = backbone["model"].get("twig_layers"), f"model.path={m.path}"
            if twig is None:
                raise ConfigError(f"model.twig_init='model' but {where} has no twig (no model.twig_layers.*, "
                                  "config.json enable_twig false); name the stage-1 run: --config.model.twig_init=RUN")
            K = registry.read_config(label_parts.model_path(m.path)).qzoom.twig_K
        else:
            twig, meta = qzoom_checkpoint.read_run(init)
            if meta.get("stage") != "sdrpn":
                raise ConfigError(f"model.twig_init={init!r} is a {meta.get('stage')!r} run, not a stage-1 run")
            where, K = f"model.twig_init={init}", meta["K"]
        T = jax.tree_util.tree_leaves(twig)[0].shape[0]
        if (K, T) != (m.K, m.T):
            raise ConfigError(f"{where}: its twig has K={K}, T={T}, but model.K={m.K}, model.T={m.T}")
        return twig, {**backbone, "model": model}

    def example_fn(self, processor, config):
        d = self.cfg.data
        return functools.partial(stage1.make_example, processor=processor, config=config, max_len=d.max_len,
                                 grid=d.grid, binary_coff=d.binary_coff, bg_coff=d.bg_coff,
                                 chat_format=d.chat_format)

    def step_layout(self, config):
        """The vision layout shared by every row: one square-padded image at the fixed grid."""
        side = self.cfg.data.grid * config.vision.spatial_merge_size
        return registry.backbone(config).vision_layout(np.array([[1, side, side]]), config.vision)


class _Subset:
    """The records ``indices`` of a random-access source, in that order."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[int(i)]]


class Gate(_Head):
    """Stage 3 -- the dynamic gate learns whether the low-resolution look suffices (training reference §4)."""

    name = "gate"
    loss_fn = staticmethod(gate_objective.loss_fn)
    progress: ClassVar[dict[str, str]] = {"loss": "loss", "acc": "accuracy"}
    annotate = True  # the label and budget are drawn per fetch from (seed, epoch, index)
    accum_weight = "labelled"

    def __init__(self, cfg):
        self.cfg = cfg
        self.threshold = cfg.train.threshold
        self.summary = None  # the pool's rule counts and largest drawable budget, from training_source
        _check_twig_run(cfg.model.twig_run, cfg.model.K)
        self.twig_backbone = _twig_backbone(cfg.model.twig_run, label_parts.model_path(cfg.model.path))

    def training_source(self, workdir: str):
        """(the consistency-filtered pool, checkpoint meta). Answers come from given datasets, an upstream
        stage-3 pickle converted once, or an answer run in the workdir."""
        label_dirs = _label_dirs(self.cfg.data, workdir, tfds_stage3.build_pickle_answers, "stage3_",
                                 lambda: gate_labels.generate_answers(_label_run(self.cfg.answers, self.cfg.model.path),
                                                                      workdir))
        source, self.summary = tfds_stage3.training_pool(
            label_dirs, os.path.join(workdir, "data", "gate_pool.json"), seed=self.cfg.seed,
            roi_samples=self.cfg.data.roi_samples, high=self.cfg.data.high, write_cache=jax.process_index() == 0)
        counts = self.summary["counts"]
        distributed.print0(f"gate pool: {len(source)} samples = {counts['hard']} hard + {self.summary['pool_easy']} "
                           f"of {counts['easy']} easy; dropped: "
                           + ", ".join(f"{c} {counts[c]}" for c in stage3.CATEGORIES[2:]))
        twig_run = self.cfg.model.twig_run
        if twig_run and "://" not in twig_run:
            twig_run = os.path.abspath(twig_run)
        return source, {"label_dirs": label_dirs, "twig_run": twig_run, "twig_backbone": self.twig_backbone,
                        "pool": self.summary}

    def init_params(self, base_layers, K: int, T: int):
        return gate_lib.init_gate_params(base_layers, K, T, jax.random.key(self.cfg.seed))

    def example_fn(self, processor, config):
        n_patches = stage3.max_patches(self.summary["max_budget"], config.vision.merge_unit)
        return functools.partial(stage3.make_example, processor=processor, config=config, seed=self.cfg.seed,
                                 max_len=self.cfg.data.max_len, n_patches=n_patches, high=self.cfg.data.high)

    def step_layout(self, config) -> None:
        """None: every row carries its own vision layout (images differ in size)."""
        del config


def _check_twig_run(twig_run: str, K: int) -> None:
    """The gate branches off the layer the twig of ``twig_run`` does (upstream skips base layers otherwise)."""
    if not twig_run:
        return
    meta = _stage1_meta(twig_run)
    if meta.get("stage") != "sdrpn" or meta.get("K") != K:
        raise ValueError(f"model.twig_run={twig_run!r} is a {meta.get('stage')!r} run with K={meta.get('K')}, but "
                         f"the gate needs an 'sdrpn' twig with the same K={K} (high_res_K must equal twig_K)")


def _twig_backbone(twig_run: str, backbone: str) -> str | None:
    """The backbone the twig of ``twig_run`` was trained on, recorded in the gate's meta so that loading the
    gate accepts the twig (None without a twig run). It may differ from the gate's own backbone -- upstream's
    Qwen2.5 recipe puts the gate on the stage-2 model and keeps the base model's stage-1 twig -- but the two must
    be the same architecture, checked here, before training."""
    if not twig_run:
        return None
    trained_on = _stage1_meta(twig_run).get("backbone")
    if trained_on is None:
        return None
    mine, theirs = registry.read_config(backbone), registry.read_config(trained_on)
    if (mine.model_type, mine.text) != (theirs.model_type, theirs.text):
        raise ConfigError(f"model.twig_run={twig_run!r} was trained on {trained_on}, whose decoder differs from that "
                          f"of model.path={backbone} ({theirs.model_type} {theirs.text} vs {mine.model_type} "
                          f"{mine.text}); the twig branches off this backbone's layer K")
    return _absolute(trained_on)


def _stage1_meta(twig_run: str) -> dict:
    """The checkpoint meta of the latest step of ``twig_run`` (FileNotFoundError without one)."""
    directory = epath.Path(twig_run) / "checkpoints"
    meta = None
    if directory.is_dir():
        ckpt = TrainCheckpointer(directory, save_interval_steps=1)
        step = ckpt.latest_step()
        meta = None if step is None else ckpt.read_meta(step)
        ckpt.close()
    if meta is None:
        raise FileNotFoundError(f"model.twig_run={twig_run!r} holds no stage-1 checkpoint under {directory}")
    return meta


class Sft:
    """Supervised fine-tuning of any subset of the VLM (``train.trainable`` path patterns) on upstream's
    conversation JSONL (training reference §5.2); the rest of the model stays frozen."""

    name = "sft"
    branches = False
    progress: ClassVar[dict[str, str]] = {"loss": "loss", "acc": "token_accuracy"}
    annotate = False
    accum_weight = "supervised_tokens"  # accumulated gradients are the mean over every supervised token
    threshold = None

    def __init__(self, cfg):
        self.cfg = cfg
        t, m = cfg.train, cfg.model
        self.master_dtype = t.master_dtype
        vision_remat = t.get("vision_remat", "none")
        for key, value in (("remat", t.remat), ("vision_remat", vision_remat)):
            if value not in sft.REMAT:
                raise ConfigError(f"train.{key}={value!r}; choose one of {sft.REMAT}")
        vlm.as_dtype(t.master_dtype), vlm.as_dtype(m.dtype)  # unknown names fail here, not after loading
        attention.resolve(m.attn_impl)  # a kernel this platform cannot run, too
        if cfg.data.chat_format not in stage1.CHAT_FORMATS:
            raise ConfigError(f"data.chat_format={cfg.data.chat_format!r}; choose one of {stage1.CHAT_FORMATS}")
        if t.global_batch_size % t.accum_steps:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not split into "
                              f"train.accum_steps={t.accum_steps} micro-batches")
        # The patterns are checked on the param shapes now, before any data or weights are read.
        config = self.config = registry.read_config(label_parts.model_path(m.path))
        if (t.remat, vision_remat) != ("none", "none") and registry.backbone(config).deepstack:
            raise ConfigError(f"train.remat={t.remat!r} / train.vision_remat={vision_remat!r} are not supported on "
                              f"{config.model_type} (DeepStack)")
        shapes = jax.eval_shape(lambda: vlm.init_params(config, jax.random.key(0)))
        sft.trainable_mask(shapes, self.patterns(config))
        self.loss_fn = functools.partial(sft.loss_fn, compute_dtype=m.dtype, remat=t.remat, vision_remat=vision_remat,
                                         chunk=t.loss_chunk)

    def training_source(self, workdir: str):
        """Records of prepared conversation datasets (``data.tfds_dirs``, ``data.tfds_sft``) or of the JSONL."""
        del workdir
        d = self.cfg.data
        if d.tfds_dirs:
            return tfds_sft.ConversationSource(list(d.tfds_dirs)), {"tfds_dirs": list(d.tfds_dirs)}
        if not d.jsonl:
            raise ConfigError("data.jsonl and data.tfds_dirs are empty: name upstream's conversation JSONL (and "
                              "data.image_root) or prepared conversation datasets")
        return conversations.read_conversations(d.jsonl, d.image_root or None), {"jsonl": os.path.abspath(d.jsonl)}

    def trainable(self, backbone):
        """(trainable leaves, frozen rest) of the loaded backbone: the frozen rest is all the step keeps of it.
        The objective also pins its activations to the batch sharding of the backbone's mesh (``sft``)."""
        mesh = jax.tree_util.tree_leaves(backbone)[0].sharding.mesh
        activations = step_lib.batch_sharding(mesh, parallel.rules_with(self.cfg.sharding_rules))
        self.loss_fn = functools.partial(self.loss_fn, activations=activations)
        return sft.split(backbone, sft.trainable_mask(backbone, self.patterns(self.config)))

    def patterns(self, config) -> tuple[str, ...]:
        del config
        return tuple(self.cfg.train.trainable)

    def bucket_of(self, processor, config):
        """record -> (padded tokens, padded patch rows): each batch is made of one bucket, so a run compiles one
        step per bucket that occurs (``pipeline.bucketed_loader``), at most ``data.max_len`` x ``data.max_patches``.
        With ``data.packing``: a ``packing.Packing`` (record -> sizes), and rows hold several samples, at most
        ``data.pack_images`` images."""
        d = self.cfg.data
        kwargs = dict(processor=processor, max_len=d.max_len, max_patches=d.max_patches, max_images=d.max_images,
                      min_pixels=d.min_pixels, max_pixels=d.max_pixels, chat_format=d.chat_format)
        if d.get("packing", False):
            return packing.Packing(functools.partial(conversations.sample_size, **kwargs), d.max_len,
                                   d.max_patches, d.pack_images)
        return functools.partial(conversations.bucket_of, **kwargs)

    def example_fn(self, processor, config):
        d = self.cfg.data
        kwargs = dict(processor=processor, config=config, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                      chat_format=d.chat_format)
        if d.get("packing", False):
            return functools.partial(packing.make_packed_example, max_images=d.pack_images, **kwargs)
        return functools.partial(_sft_example, max_images=d.max_images, **kwargs)

    def step_layout(self, config) -> None:
        """None: every row carries its own vision layout."""
        del config


def _sft_example(record, shape, **kwargs):
    """The SFT example of ``record`` padded to its bucket ``shape`` = (tokens, patch rows); picklable."""
    return conversations.make_example(record, max_len=shape[0], n_patches=shape[1], **kwargs)


class PostSft(Sft):
    """Stage 2 -- targeted post-SFT: the LLM fine-tuned on RoI-augmented inputs built in the loop with the frozen
    stage-1 twig (``training/post_sft.py``; training reference §2.3-§2.4). Its checkpoint is an SFT run's (the
    trained leaves over the backbone, ``saved_as`` "sft"), so ``sft_run.export`` and convert read it; the meta
    adds where the twig came from."""

    name = "post_sft"
    saved_as = "sft"

    def __init__(self, cfg):
        t, m = cfg.train, cfg.model
        if t.tied_embeddings not in post_sft.TIED_CHOICES:
            raise ConfigError(f"train.tied_embeddings={t.tied_embeddings!r}; choose one of {post_sft.TIED_CHOICES}")
        super().__init__(cfg)
        path = label_parts.model_path(m.path)
        qz = self.config.qzoom
        if m.twig_run:  # a stage-1 run's twig (on this backbone or on the one it was fine-tuned from)
            meta = _stage1_meta(m.twig_run)
            if meta.get("stage") != "sdrpn":
                raise ConfigError(f"model.twig_run={m.twig_run!r} is a {meta.get('stage')!r} run, not a stage-1 "
                                  f"('sdrpn') run")
            self.K, self.T = meta["K"], meta["T"]
            _twig_backbone(m.twig_run, path)  # the same decoder, checked before anything is loaded
        elif qz.enable_twig:
            self.K, self.T = qz.twig_K, qz.twig_T
        else:
            raise ConfigError(f"model.path={path}: the backbone has no twig branch (no model.twig_layers.*, "
                              f"config.json enable_twig false) and model.twig_run is empty; post-SFT needs the "
                              f"stage-1 twig: --config.model.twig_run=RUN or a Q-Zoom checkpoint")
        self.twig = self.source = None

    def patterns(self, config) -> tuple[str, ...]:
        return post_sft.trainable_patterns(config, self.cfg.train.trainable, self.cfg.train.tied_embeddings)

    def training_source(self, workdir: str):
        source, meta = super().training_source(workdir)
        self.source = source
        twig_from = self.cfg.model.twig_run or label_parts.model_path(self.cfg.model.path)
        return post_sft.Indexed(source), {**meta, "K": self.K, "T": self.T,
                                          "post_sft": {"twig": _absolute(twig_from)}}

    def trainable(self, backbone):
        """As SFT, without the branches: the twig (from ``model.twig_run`` or the checkpoint) is kept aside for
        the RoI pass, the gate dropped."""
        model = dict(backbone["model"])
        twig = model.pop("twig_layers", None)
        for name in ("high_res_layers", "high_res_head"):
            model.pop(name, None)
        if self.cfg.model.twig_run:
            twig = qzoom_checkpoint.read_run(self.cfg.model.twig_run)[0]
        mesh = jax.tree_util.tree_leaves(backbone)[0].sharding.mesh
        rules = parallel.rules_with(self.cfg.sharding_rules)
        dtype = jax.tree_util.tree_leaves(backbone)[0].dtype
        twig = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), twig)
        self.twig = jax.device_put(twig, param_axes.param_shardings(twig, mesh, rules))
        return super().trainable({**backbone, "model": model})

    def example_fn(self, processor, config):
        d = self.cfg.data
        return functools.partial(post_sft.example, processor=processor, config=config, min_pixels=d.min_pixels,
                                 max_pixels=d.max_pixels, chat_format=d.chat_format)

    def batches(self, data_iter, mesh, rules, current, frozen, processor, config):
        d, t, m = self.cfg.data, self.cfg.train, self.cfg.model
        return post_sft.RoiBatches(data_iter, self.source, processor, config, mesh, rules, current, frozen,
                                   self.twig, K=self.K, attn_impl=m.attn_impl, compute_dtype=m.dtype,
                                   threshold=t.roi_threshold, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                                   max_len=d.max_len, max_patches=d.max_patches, workers=d.crop_workers,
                                   add_noise_to_roi=t.get("add_noise_to_roi", False), seed=self.cfg.seed)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


STAGES = {stage.name: stage for stage in (Sdrpn, Gate, Sft, PostSft, qmop_stage.Qmop)}


def get(cfg):
    """The stage of ``cfg.stage`` (default "sdrpn"), bound to ``cfg``."""
    name = cfg.get("stage", "sdrpn")
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {sorted(STAGES)}")
    return STAGES[name](cfg)
