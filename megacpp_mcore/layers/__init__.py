"""nn.Modules this project owns (the flash-linear-attention ``layers`` tier).

``mamba2.Mamba2Mixer`` (letter M's CPU path, Megatron ``MambaMixer``'s reference twin) and
``m2rnn.RecurrentMixer`` (letter R) are mixers that sit inside Megatron's ``MambaLayer``
(norm + mixer + residual); ``sdpa.SDPACoreAttention`` is the local backend's attention core;
``norm.LocalNorm`` the local backend's norm.
"""
