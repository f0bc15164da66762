"""Infrastructure: topology, nats-server configs, brokers, a local mesh, credentials, compose. Imports no job module."""
