"""bids_app.model: a model from its name to its networks.

``registry`` (named models), ``download`` (HTTPS, Zenodo, resumable downloads) and ``cache``
(pulled models) find a model's files; ``archive`` unpacks zips safely; ``card`` parses the model
card; ``resolve`` turns ``--model`` into a :class:`~bids_app.model.resolve.ResolvedModel` and
verifies its files; ``orientation`` is the voxel order the network sees; ``checkpoints`` reads
weights without unpickling code; ``ensemble`` is the one loader of the networks;
``provenance`` is the model block of the sidecars. The allow-lists of what ``plans.json`` may
name are :mod:`bids_app.core.plans_allowlist` (the core checks them again where it builds the network).
"""
