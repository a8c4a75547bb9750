/* eventstream.js: an EventSource that comes back after a deploy.
 * A dependency-free ES module, served by the EventStream blueprint.
 * Its documentation is the page "The browser module" (docs/client.rst).
 *
 *   import {connect} from "/events/eventstream.js";
 *   const stream = connect("/events?channel=chat", {
 *     json: true, events: {chat: (data, event) => show(data)},
 *   });
 *
 * connect(url, options) returns {close(), lastEventId, state}.
 * Options, all optional: events, onMessage, json, onOpen, onState,
 * onReset, onError, onEnd, lastEventId, minDelay, maxDelay,
 * withCredentials.
 */

export function connect(url, options = {}) {
  const o = options;
  const handle = {lastEventId: o.lastEventId || "", close};
  let source, timer, failures = 0;

  function setState(state, delay) {
    handle.state = state;
    o.onState?.(state, delay);
  }

  function close() {
    clearTimeout(timer);
    source.close();
    if (handle.state !== "closed") setState("closed");
  }

  function on(type, fn, json) {
    source.addEventListener(type, (event) => {
      // A new EventSource knows no id until the server sends one.
      if (event.lastEventId) handle.lastEventId = event.lastEventId;
      let data = event.data;
      try {
        if (json) data = JSON.parse(data);
      } catch (e) {
        return o.onError?.({status: 0, message: e.message, event});
      }
      fn(data, event);
    });
  }

  // The URL to open now: a new EventSource sends no Last-Event-ID header.
  function address() {
    const target = new URL(url, location.href);
    if (handle.lastEventId) target.searchParams.set("lastEventId", handle.lastEventId);
    return target;
  }

  function restart() {
    const ceiling = Math.min(o.maxDelay ?? 30000, (o.minDelay ?? 1000) * 2 ** failures++);
    // Jittered, so that pages do not all come back at once.
    const delay = Math.round((ceiling * (1 + Math.random())) / 2);
    timer = setTimeout(start, delay);
    setState("reconnecting", delay);
  }

  // EventSource does not say which status made it give up. A HEAD request
  // gets the same answer without starting the stream; 204 means finished,
  // and a 4xx other than 408 and 429 will not change by asking again.
  // Anything else, a failed request included, may pass.
  function probe() {
    fetch(address(), {
      method: "HEAD",
      headers: {Accept: "text/event-stream"},
      credentials: o.withCredentials ? "include" : "same-origin",
      cache: "no-store",
    }).catch(() => ({status: 0})).then(({status, statusText}) => {
      // close() while the probe was under way is the last word.
      if (handle.state === "closed") return;
      if (status === 204) {
        close();
        o.onEnd?.();
      } else if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
        close();
        o.onError?.({status, message: statusText || `The server answered ${status}.`});
      } else restart();
    });
  }

  function start() {
    source = new EventSource(address(), {withCredentials: o.withCredentials});
    source.onopen = (event) => {
      failures = 0;
      setState("open");
      o.onOpen?.(event);
    };
    source.onerror = () => {
      // Only an EventSource that gave up needs replacing.
      if (source.readyState === EventSource.CLOSED) probe();
      else setState("reconnecting");
    };
    for (const [type, fn] of Object.entries(o.events || {})) on(type, fn, o.json);
    if (o.onMessage) on("message", o.onMessage, o.json);
    on("eventstream.reset", (data, event) => o.onReset?.(event));
    on("eventstream.end", (data, event) => {
      close();
      o.onEnd?.(event);
    });
    // Asking again will not change a 4xx; after others the server ends
    // the stream and EventSource retries by itself.
    on("eventstream.error", ({status, message}) => {
      if (status >= 400 && status < 500) close();
      o.onError?.({status, message});
    }, true);
  }

  setState("connecting");
  start();
  return handle;
}
