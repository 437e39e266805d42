"""OpenAI's Files and Batches API: uploads kept in a file store, batch records, and the batch
jobs the agents run through the SSH hop."""
