"""The pages people log in to: OpenID Connect login, the self-service page and the operator
dashboard (served from hub/static/)."""
