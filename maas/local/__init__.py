"""Local runtime: the Triton launcher (maas.local.triton) and `maas up`."""
