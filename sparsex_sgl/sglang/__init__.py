"""The SGLang 0.5.23 adapter: plugin entry point, segment-graph cache, attention backend, model hook.

Everything here runs inside SGLang processes; only ``compat`` imports sglang (the pinned seam), and the
method itself lives in the engine-free core (``sparsex_sgl.core``).
"""
