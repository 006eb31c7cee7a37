"""The engine-free core of SparseX: no SGLang import, no Triton import.

``segments`` (piece identity), ``graph`` (what is cached under which context), ``request`` (one request's
state), ``rope`` (delta re-rotation), ``config`` (the selection's settings), ``selection`` (the policies and
the budget), ``sparse_extend`` (one batch's plan, row selection and sparse layers) and ``ops`` (the op sets
those run on). The SGLang adapter (``sparsex_sgl.sglang``) and the reference executor
(``sparsex_sgl.reference``) both run it.
"""
