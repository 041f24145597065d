"""AD methods behind one registry: ``get_method(name)``, ``list_methods()``, ``register(spec)``."""

from ad_eval.methods.registry import ANY_LAYER_SET, MethodSpec, get_method, list_methods, register, unregister

__all__ = ["ANY_LAYER_SET", "MethodSpec", "get_method", "list_methods", "register", "unregister"]
