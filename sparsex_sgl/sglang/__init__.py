"""The SGLang 0.5.23 adapter: plugin entry point, segment-graph cache, attention backend, model hook.

Everything here runs inside SGLang processes and imports sglang; the method itself lives in the
engine-agnostic core (``sparsex_sgl.core.graph``, ``select``, ``rope``, ``hybrid``).
"""
