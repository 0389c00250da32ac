"""Privacy of the released head: differential-privacy accounting and membership inference.

:mod:`.accountant` turns a Gaussian mechanism's noise multiplier and step count into
(epsilon, delta) with Google's ``dp-accounting`` (PLD accountant, RDP as a cross-check), and
back; :mod:`.membership` attacks a trained head with its train samples as members and
held-out samples as non-members. Neither imports Flower, TenSEAL or torch.
"""
