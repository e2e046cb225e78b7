"""The decoding runtime: the loop (decode.py: prefill, propose, verify, accept, commit),
the acceptance rules (acceptance.py), sampling (sampling.py), statistics (metrics.py), the
number of drafts per step (blockpolicy.py), the proposers (proposers/), what a `--draft`
value loads (loading.py) and text in / text out (pipeline.py). It knows the target and
the drafter only through hf/ and drafter/."""
