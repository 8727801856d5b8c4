"""Plasticity tools: FIRE (isometry re-init), DASH (direction-aware shrinking), ReDo
(dormant-unit recycling), each its own training hook on its own cadence.

``parts`` finds the logical parts of fused weights the layers declare, ``adapter`` knows where
a parameter's truth lives in Megatron's optimizers, ``sharding`` holds the collectives."""
