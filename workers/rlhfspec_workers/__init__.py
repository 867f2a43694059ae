"""The data plane: tiny-model kit, generation, coordinator, inference, trainer, weight sync."""
