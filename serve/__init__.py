"""CPU side of Atelier: config, public API schemas and routes, router. Never imports torch."""
