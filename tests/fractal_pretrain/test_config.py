"""``fractal_pretrain.config`` helpers shared by both command lines."""

from __future__ import annotations

import pytest

from ad_eval.cell import check_device
from fractal_pretrain.config import ConfigError
from fractal_pretrain.config import check_device as check_named_device


@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_ad_eval_and_adapt_take_the_same_device_forms(value):
    assert check_device(value) == value
    assert check_named_device("model.render_device", value, also=("cpu-reference",)) == value


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda:0:1", "CPU", "", 0, None])
def test_a_bad_device_is_one_line_naming_the_key_value_and_forms(value):
    """ad-eval's ``device`` and adapt's ``model.render_device`` had a pattern and a message each."""
    with pytest.raises(ConfigError) as ad_eval_error:
        check_device(value)
    assert str(ad_eval_error.value) == f"device={value!r}: must be auto, cpu, cuda or cuda:N"
    with pytest.raises(ConfigError) as adapt_error:
        check_named_device("model.render_device", value, also=("cpu-reference",))
    assert str(adapt_error.value) == f"model.render_device={value!r}: must be auto, cpu, cpu-reference, cuda or cuda:N"


def test_cpu_reference_is_a_device_only_where_allowed():
    assert check_named_device("model.render_device", "cpu-reference", also=("cpu-reference",)) == "cpu-reference"
    with pytest.raises(ConfigError, match=r"^device='cpu-reference': must be auto, cpu, cuda or cuda:N$"):
        check_device("cpu-reference")
