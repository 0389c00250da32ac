"""Head training in the diagonal layout: one loop, numpy or CKKS backend.

See :mod:`medfed.crypto.diagonal` for the layout. One epoch (full-batch gradient step)::

    Wb    = rot(W, b)                    b < baby            (chained +1 rotations)
    inner = sum_{g, b} D[g, a, b] * Wb   per giant step a    (one relinearization per sum)
    z     = inner_0 + rot(inner_1 + rot(inner_2 + ...))       (Horner, +baby rotations)
    r     = c * (sigmoid_approx(z + bias) - y)
    Q[g, b] = sum_{blocks, a} D[g, a, b] * rot(r, -baby * a)
    F[g]  = sum_b rot(Q[g, b], -b)                             (Horner, -1 rotations)
    Qb    = sum_blocks mask * r
    W, bias -= key_holder_sums(F, Qb)                         (one masked-sum round)

The plaintext reference (``PlainDiagonalBackend``) executes exactly this on numpy vectors.

Modules: :mod:`~.backend` (the backend protocol, :class:`Block`), :mod:`~.claims` (contested
cells and claim boards), :mod:`~.planner` (shares and task plans), :mod:`~.compute`
(:class:`DiagonalCompute`), :mod:`~.epoch` (the training loop, :func:`head_matrix`),
:mod:`~.plain` and :mod:`~.encrypted` (the two backends, :func:`galois_steps`) and
:mod:`~.keyholder` (the key holder's side of the masked-sum round).
"""
