"""Long-context KV selection (MPCache and its baselines): per-block key bounds kept in the paged
cache, the policies that pick which blocks each decode attends to, the torch reference of
attention over the picked blocks, long-context task generators and the fidelity evaluation.

The cache keeps every token; a policy only narrows what one decode step reads. The native
decode kernel takes the picked blocks as a per-(sequence, kv head) block table, so selection
costs no copy of the cache.
"""
