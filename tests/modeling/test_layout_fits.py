"""The shapes the config validation knows without NeMo match NeMo's, and a shape read from a
checkpoint is checked against the layout with a one-line ConfigError."""

from __future__ import annotations

import dataclasses

import pytest

from nemo_dft.config.loading import ConfigError
from nemo_dft.config.training import ARCHITECTURE_SHAPES


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_SHAPES))
def test_architecture_shapes_match_nemo(arch):
    from nemo_dft.modeling.gpt_config import ARCHITECTURES

    defaults = {f.name: f.default for f in dataclasses.fields(ARCHITECTURES[arch])}
    assert {key: defaults[key] for key in ARCHITECTURE_SHAPES[arch]} == ARCHITECTURE_SHAPES[arch]


def test_model_arch_choices_are_the_nemo_architectures():
    from nemo_dft.config.training import MODEL_ARCHS
    from nemo_dft.modeling.gpt_config import ARCHITECTURES

    assert sorted(MODEL_ARCHS) == sorted(ARCHITECTURES)


@pytest.mark.parametrize(("tp", "pp", "named"), [(16, 1, "num_query_groups=8"), (3, 1, "num_attention_heads=32"),
                                                 (1, 40, "40 stages exceed")])
def test_checkpoint_shape_that_does_not_fit_the_layout_is_a_config_error(tp, pp, named):
    from nemo.collections import llm

    from nemo_dft.modeling.gpt_config import check_layout_fits

    stored = llm.MistralConfig7B()  # what checkpoint_gpt_config returns for a Mistral checkpoint
    shape = {name: getattr(stored, name) for name in ("num_layers", "num_attention_heads", "num_query_groups")}
    with pytest.raises(ConfigError, match=named):
        check_layout_fits(shape, tp, pp)
    check_layout_fits(shape, 8, 4)

