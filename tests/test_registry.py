import pytest

from medvlp.registry import METHODS, Registry, RegistryError


def test_unknown_name_suggests_closest():
    with pytest.raises(RegistryError) as err:
        METHODS.get("clpi")
    msg = str(err.value)
    assert "Unknown method 'clpi'" in msg and "Did you mean 'clip'?" in msg and "Available:" in msg


def test_register_decorator_and_conflict():
    reg = Registry("thing")

    @reg.register("a", help="first")
    class A:
        pass

    assert reg.get("A") is A and reg.names() == ["a"] and reg.describe("a") == "first"

    class Other:
        pass

    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(Other)


def test_lazy_entry_imports_on_first_use():
    reg = Registry("thing")
    reg.register_lazy("od", "collections:OrderedDict", help="ordered")
    from collections import OrderedDict

    assert "od" in reg.names() and reg.get("od") is OrderedDict


def test_plugins_entry_point_group(monkeypatch):
    """A third-party package registers through the medvlp.plugins entry-point group."""
    import medvlp.registry as r

    calls = []

    class EP:
        name, value = "demo_plugin", "pkg:register"

        def load(self):
            def register():
                calls.append(1)
                r.METHODS.register("plugin_method")(type("PluginMethod", (), {}))

            return register

    monkeypatch.setattr(r, "_plugins_loaded", False)
    monkeypatch.setattr(r, "entry_points", lambda group: [EP()] if group == r.ENTRY_POINT_GROUP else [])
    try:
        assert "plugin_method" in r.METHODS.names()
        assert calls == [1]
    finally:
        r.METHODS._items.pop("plugin_method", None)
