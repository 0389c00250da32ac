"""Scaling the aggregator out with Ray: the cluster session and encrypted batch workers.

:mod:`~medfed.scale.cluster` picks the Ray to use and shuts down what it started;
:mod:`~medfed.scale.workers` holds the long-lived actors that share an epoch's encrypted work
(``workers``, mode "embeddings"), and :mod:`~medfed.scale.node_claims` hands contested cells
out among the workers of one node.
"""
