"""EngineConfig validation: bad values are refused with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamv2v import BankConfig, EngineConfig


def test_reference_defaults_and_derived_timestep_indices():
    cfg = EngineConfig()
    assert (cfg.width, cfg.height, cfg.steps, cfg.strength, cfg.seed) == (512, 512, 4, 0.4, 2)
    assert cfg.timestep_indices() == (30, 35, 40, 45)
    assert EngineConfig(steps=1, strength=1.0).timestep_indices() == (0,)
    assert EngineConfig(steps=3, strength=0.6).timestep_indices() == (20, 30, 40)


def test_explicit_t_index_list_sets_steps():
    cfg = EngineConfig(t_index_list=[10, 20, 40])
    assert cfg.steps == 3 and cfg.timestep_indices() == (10, 20, 40)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"width": 500}, "width"),
        ({"height": 32}, "height"),
        ({"strength": 0}, "strength"),
        ({"t_index_list": [30, 20]}, "t_index_list"),
        ({"t_index_list": [50]}, "t_index_list"),
        ({"guidance": "cfg"}, "guidance"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"stepz": 3}, "stepz"),
        ({"loras": [{"id": "x", "scale": 9}]}, "scale"),
        ({"bank": {"interval": 0}}, "interval"),
    ],
)
def test_invalid_values_name_the_field(values, field):
    with pytest.raises(ValidationError) as err:
        EngineConfig(**values)
    assert field in str(err.value)


def test_steps_that_disagree_with_t_index_list_are_refused():
    with pytest.raises(ValidationError, match="steps=2 disagrees with t_index_list"):
        EngineConfig(steps=2, t_index_list=[30, 35, 40])


def test_strength_too_low_for_the_step_count_says_what_to_raise():
    with pytest.raises(ValidationError, match=r"raise strength to at least 0\.08"):
        EngineConfig(steps=4, strength=0.04)


def test_dyme_merge_ratio_must_keep_the_bank_size_constant():
    assert BankConfig(max_frames=3, merge_ratio=0.25).max_frames == 3
    with pytest.raises(ValidationError, match=r"merge_ratio=0.5"):
        BankConfig(max_frames=1, merge_ratio=0.4)
