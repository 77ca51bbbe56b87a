"""GPU side of Atelier: model deployments, batching and engines. Never sees HTTP."""
