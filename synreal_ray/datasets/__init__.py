"""Dataset layouts, the Cityscapes label table and the procedural demo data."""
