import jax
import numpy as np
import pytest

from fusionjax.io import _names


class _Obj:
    pass


def test_flat_names_of_dicts_lists_and_attributes():
    x = np.zeros(1)
    tree = {"model": {"layers": [{"w": x}, {"w": x}]}, "head": (x,)}
    assert list(_names.tree_to_flat(tree)) == [
        "head.0",
        "model.layers.0.w",
        "model.layers.1.w",
    ]
    path = (jax.tree_util.GetAttrKey("kernel"), jax.tree_util.FlattenedIndexKey(3))
    assert _names.flat_name(path) == "kernel.3"


def test_nest_keeps_digit_keys_as_strings_and_round_trips():
    flat = {"model.layers.0.w": 1, "model.layers.10.w": 2, "head": 3}
    tree = _names.nest(flat)
    assert tree == {"model": {"layers": {"0": {"w": 1}, "10": {"w": 2}}}, "head": 3}
    assert _names.tree_to_flat(tree) == {"head": 3, "model.layers.0.w": 1, "model.layers.10.w": 2}


def test_dot_inside_a_key_is_an_error_naming_the_path():
    with pytest.raises(ValueError, match=r"\['a'\]\['b\.c'\].*'b\.c'"):
        _names.tree_to_flat({"a": {"b.c": np.zeros(1)}})


def test_two_leaves_with_one_name_is_an_error_naming_both():
    k = jax.tree_util
    paths = [(k.DictKey("a"), k.DictKey("0")), (k.DictKey("a"), k.SequenceKey(0))]
    with pytest.raises(ValueError, match=r"\['a'\]\['0'\] and \['a'\]\[0\] both flatten to the tensor name 'a\.0'"):
        _names.flat_names(paths)


@pytest.mark.parametrize("flat", [{"a.b": 1, "a.b.c": 2}, {"a.b.c": 2, "a.b": 1}])
def test_nest_rejects_a_name_that_is_both_tensor_and_group(flat):
    with pytest.raises(ValueError, match=r"'a\.b'.*'a\.b\.c'|'a\.b\.c'.*'a\.b'"):
        _names.nest(flat, "f.safetensors")


def test_empty_name_part_is_an_error():
    with pytest.raises(ValueError, match=r"'a\.\.b' in x.safetensors"):
        _names.nest({"a..b": 1}, "x.safetensors")
