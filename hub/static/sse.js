// Incremental parser for server-sent events as the OpenAI streaming API sends them.
// Pure: text in, complete `data` payloads out; it never touches the network or the DOM.

export class SseParser {
  constructor() {
    this.buffer = "";
  }

  // Feed decoded text; returns the data payloads of every event completed by it.
  push(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    const payloads = [];
    let end = this.buffer.indexOf("\n\n");
    while (end !== -1) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data = eventData(block);
      if (data !== null) payloads.push(data);
      end = this.buffer.indexOf("\n\n");
    }
    return payloads;
  }

  // The stream ended: a last event without its blank line still counts.
  finish() {
    const data = eventData(this.buffer);
    this.buffer = "";
    return data === null ? [] : [data];
  }
}

function eventData(block) {
  const lines = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) {
      lines.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    }
  }
  return lines.length ? lines.join("\n") : null;
}
