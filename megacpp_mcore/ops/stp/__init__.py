"""STP, the trajectory-straightness auxiliary loss: only its oracle lives here.

* ``naive.py``: ``naive_stp_loss``, the loss from its definition with plain loops, on given
  sample indices. The loss used in training (sampling, the sequence split, the hook) is
  ``megacpp_mcore/stp.py``, a higher layer; ``tests/test_stp_oracle.py`` holds the two together.
"""
