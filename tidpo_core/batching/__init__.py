"""From text to tensors: chat templates, tokenization, features, collation and the shared-prompt packing."""
