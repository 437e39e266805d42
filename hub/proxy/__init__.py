"""The one proxy path: a client request in, checked, shaped and metered, the upstream's answer out
(whole or streamed), with one mapping of failures to OpenAI (or Anthropic) error answers."""
