"""Head training arithmetic, free of Flower and Ray: the same code on numpy or ciphertexts.

The shared feature map (:mod:`~medfed.train.normalization`), polynomial sigmoids
(:mod:`~medfed.train.poly`), schedule and prediction (:mod:`~medfed.train.head`), the encrypted
training loop in the diagonal layout (:mod:`~medfed.train.diagonal`), mode "updates"' local
training and FedAvg (:mod:`~medfed.train.local`), and the exact logistic-regression yardstick
(:mod:`~medfed.train.reference`).
"""
