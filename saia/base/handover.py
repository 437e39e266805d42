"""The agent hand-over on restart, as both ends of the hop see it.

A stopping agent (SIGTERM) hands its state and leader lock to the next agent at once, but
keeps serving the streams already in flight on its connections. A new request that still
reaches it on such a connection is answered 503 with RETIRING_HEADER: the hub then opens
a new connection (which reaches the new agent), sends the request again there, and no
longer uses the old connection, which the old agent closes once its streams are done.
"""

RETIRING_HEADER = "x-saia-agent-retiring"
