"""Router service: the one API callers use (maas.v1.Router) plus the Open Inference Protocol passthrough.

servicer.py converts protobuf ⇄ domain types; routing.py picks versions from the registry's state
(kept fresh by watcher.py); dataplane.py runs a version's pipeline (preprocessing → Triton →
postprocessing) with peers.py; shadow.py mirrors requests off the request path.
"""
