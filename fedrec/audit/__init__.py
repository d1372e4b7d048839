"""The privacy audit (``python -m fedrec.audit``): attacks on what a curious server and anyone
who queries the trained guide can see, and an empirical lower bound on epsilon."""
