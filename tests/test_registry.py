"""Registry lookups and 'did you mean' errors."""

import pytest

from ssl_bench.registry import Registry, RegistryError


def test_register_lookup_and_errors():
    reg = Registry("widget")

    @reg.register("alpha", "first widget")
    def alpha():
        return 1

    @reg.register("beta")
    def beta():
        """Second widget.

        More text."""

    assert reg.get("alpha") is alpha and reg.names() == ["alpha", "beta"]
    assert [e.description for e in reg] == ["first widget", "Second widget."]
    with pytest.raises(RegistryError) as err:
        reg.get("alpah")
    assert str(err.value) == "unknown widget 'alpah'; did you mean 'alpha'? Valid widgets: alpha, beta"
    with pytest.raises(ValueError, match="twice"):
        reg.add("alpha", alpha)
