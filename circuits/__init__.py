"""Attribution graphs: the replacement model, attribution, pruning, queries and interventions."""
