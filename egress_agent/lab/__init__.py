"""The lab: the whole system on one machine in network namespaces.

`topology.Lab` builds and removes it, `echo` is the origin's echo server and
the probes that ask it which source address it saw, `netns` wraps `ip`/`nsenter`.
"""
