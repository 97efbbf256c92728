"""The region and what lies in it: the on-media format, the undo journal, the block
allocator, the table checks and mkfs. Imports nothing else of pmemfs."""
