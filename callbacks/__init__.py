"""Framework adapters: Lightning ``ShapleyCallback`` and Accelerate ``ShapleyHook``."""
