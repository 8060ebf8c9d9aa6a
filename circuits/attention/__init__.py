"""Attention in the graph: which heads carry an edge (:mod:`.heads`) and why a head attended (:mod:`.qk`)."""
