"""A model whose params are sharded over 8 host devices gives the single-device results."""

import jax
import numpy as np

from qzoom_jax.models import param_axes
from qzoom_jax.runtime import parallel
from qzoom_jax.models.vlm import QwenVL
from tests.hf_reference import batch, prompt_ids, random_pixels, tiny_pair


def test_sharded_params_match_single_device():
    _, single = tiny_pair("gqa3_win56")
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_axes.param_shardings(single.params, mesh)
    sharded = QwenVL(single.config, jax.device_put(single.params, shardings))
    q = sharded.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated

    rng = np.random.default_rng(0)
    grids = [(1, 10, 14), (1, 6, 8)]
    inputs = batch([prompt_ids(rng, 6, [35]), prompt_ids(rng, 9, [12])])
    inputs.update(pixel_values=random_pixels(rng, grids), image_grid_thw=np.array(grids))
    np.testing.assert_allclose(sharded.logits(**inputs), single.logits(**inputs), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sharded.generate(**inputs, max_new_tokens=8),
                                  single.generate(**inputs, max_new_tokens=8))
