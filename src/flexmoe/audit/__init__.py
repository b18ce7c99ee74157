"""Privacy audits of trained models: what an attacker can recover about an owner's training data.

- ``extraction``: the FlexOlmo paper's extraction attack (prefix, sampled continuations, normalised
  Levenshtein similarity of the continuation).
- ``canaries``: random secrets planted into training data, and their exposure (Carlini et al. 2019,
  "The Secret Sharer").
- ``membership``: loss-based membership inference (training vs held-out documents), as an AUC.
- ``pipeline``: plant, train the models an owner could ship, and audit each of them.

Every audit takes a scoring model (``flexmoe.evaluate.metrics.HFLM``: an HF causal LM or a composed
flexmoe model with a chosen set of experts) and reports its numbers with counts and intervals.
"""
