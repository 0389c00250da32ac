"""The federation on Flower: the untrusted aggregator, the hospitals, and how they are run.

The aggregator (:mod:`~medfed.fl.aggregator`, :mod:`~medfed.fl.updates`) and the hospitals
(:mod:`~medfed.fl.hospital`) exchange the messages of :mod:`~medfed.fl.messages`;
:mod:`~medfed.fl.launch` runs them on Flower's Ray simulation engine or in-process
(:mod:`~medfed.fl.local_grid`). Mode "updates" encrypts through the pluggable key setups of
:mod:`~medfed.fl.ciphers`; :mod:`~medfed.fl.faults` injects failures for robustness runs.
"""
