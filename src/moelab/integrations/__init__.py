"""Integrations with other libraries, one package each; each is the only moelab package that
imports its library, and registers what it adds (tracers, banks, experts implementations) when
imported. ``moelab.registry.INTEGRATIONS`` maps a library to its package, so ``moelab.trace`` of
a transformers model imports ``moelab.integrations.hf`` on first need."""
