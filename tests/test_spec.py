import pytest

from saliq import QuantSpec


def test_defaults_and_levels():
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.symmetric) == (2, 64, False)
    assert [QuantSpec(bits=b).qmax for b in (2, 3, 4)] == [3, 7, 15]


@pytest.mark.parametrize("bits", [1, 5, 8, 2.5, True])
def test_bad_bits_named(bits):
    with pytest.raises(ValueError, match=r"bits=.*allowed: \(2, 3, 4\)"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [0, 16, 48, 256])
def test_bad_group_size_named(group_size):
    with pytest.raises(ValueError, match=rf"group_size={group_size} is not supported"):
        QuantSpec(group_size=group_size)


def test_group_that_does_not_divide_names_both_numbers_and_alternatives():
    with pytest.raises(ValueError) as err:
        QuantSpec(group_size=128).group_len(576)
    msg = str(err.value)
    assert "group_size=128" in msg and "in_features=576" in msg and "[32, 64, -1]" in msg


def test_groups_and_round_trip():
    assert QuantSpec(group_size=64).num_groups(576) == 9
    assert QuantSpec(group_size=-1).num_groups(576) == 1
    spec = QuantSpec(3, 32, True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("kw, match", [
    (dict(bits=2.0), "bits=2.0"), (dict(bits=True), "bits=True"), (dict(bits="2"), "bits='2'"),
    (dict(group_size=64.0), "group_size=64.0"),
])
def test_non_integer_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kw)


def test_integer_scalars_of_other_libraries_are_integers():
    import numpy as np

    assert QuantSpec(bits=np.int64(3), group_size=np.int32(128)).bits == 3


def test_from_dict_does_not_round_a_float():
    with pytest.raises(ValueError, match="bits=2.0"):
        QuantSpec.from_dict({"bits": 2.0, "group_size": 64, "symmetric": False})
