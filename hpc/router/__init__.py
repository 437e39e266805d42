"""The router: serves the agent socket, decodes request streams and forwards each request
to a ready backend chosen by a pure routing policy."""
