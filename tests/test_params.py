import pytest
import tenseal as ts

from medfed.crypto.params import (
    MAX_LOG_Q_128,
    PRESETS,
    REFRESH_HEADROOM_BITS,
    CKKSParams,
    UnsafeParametersError,
    get_preset,
    params_from_dict,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_128_bit_and_seal_accepts_them(name):
    p = PRESETS[name]
    assert p.security_bits == 128
    assert p.log_q <= MAX_LOG_Q_128[p.poly_modulus_degree]
    # SEAL enforces the HE-standard bound itself: it must agree with our validation.
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, -1, list(p.coeff_mod_bit_sizes))
    assert ctx is not None
    assert p.depth == len(p.coeff_mod_bit_sizes) - 3  # q0, one refresh prime, the special
    assert p.refresh_primes == (60,) and p.refresh_headroom_bits >= REFRESH_HEADROOM_BITS


def test_log_q_over_security_bound_is_rejected_with_fix():
    with pytest.raises(UnsafeParametersError, match="128-bit security bound"):
        CKKSParams(8192, (60, 40, 40, 40, 60), 40)


def test_seal_also_refuses_what_we_refuse():
    with pytest.raises(ValueError):
        ts.context(ts.SCHEME_TYPE.CKKS, 8192, -1, [60, 40, 40, 40, 60])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"poly_modulus_degree": 3000}, "ring size"),
        ({"coeff_mod_bit_sizes": (60, 40)}, "at least 3"),
        ({"coeff_mod_bit_sizes": (60, 25, 30, 30, 60)}, "inner primes"),
        ({"coeff_mod_bit_sizes": (60, 60, 30, 31, 60)}, "no prime of scale_bits"),
        ({"coeff_mod_bit_sizes": (60, 30, 30, 60)}, "Add a refresh prime of at least"),
        ({"scale_bits": 10, "coeff_mod_bit_sizes": (40, 10, 40)}, "17..60"),
        ({"security_bits": 80}, "security_bits"),
        ({"coeff_mod_bit_sizes": (60, 60, 30, 30, 61)}, "17..60"),
    ],
)
def test_inconsistent_parameters_are_rejected(kwargs, match):
    chain = (60, 60, 30, 30, 60)
    base = {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": chain, "scale_bits": 30}
    with pytest.raises(UnsafeParametersError, match=match):
        CKKSParams(**{**base, **kwargs})


def test_unknown_preset_suggests_close_name():
    with pytest.raises(UnsafeParametersError, match="Did you mean 'fast'"):
        get_preset("fats")


def test_params_from_dict_rejects_unknown_keys():
    with pytest.raises(UnsafeParametersError, match="unknown CKKS parameter keys"):
        params_from_dict({"poly_modulus_degree": 8192, "bogus": 1})
    chain = [60, 60, 30, 30, 60]
    p = params_from_dict(
        {"poly_modulus_degree": 16384, "coeff_mod_bit_sizes": chain, "scale_bits": 30}
    )
    assert p.depth == 2 and p.refresh_primes == (60,)
