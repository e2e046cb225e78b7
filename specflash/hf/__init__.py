"""Everything that touches transformers' internals, and the KV caches: the target adapter
(target.py), the lean forward (leanforward.py), fixed-shape steps on static KV caches
(staticsteps.py), the drafter's context KV cache (cache.py), the batched KV cache
(batchcache.py), per-sequence slot caches and batched steps over them (slotcache.py,
batchstep.py) and the grouped-query decode attention (gqa_attention.py)."""
