/* eventstream.js: an EventSource that comes back after a deploy.
 * A dependency-free ES module, served by the EventStream blueprint.
 *
 *   import {connect} from "/events/eventstream.js";
 *   const stream = connect("/events?channel=chat", {
 *     json: true, events: {chat: (data, event) => show(data)},
 *   });
 *
 * After a stream ends, the browser reconnects with a Last-Event-ID
 * header. When it gives up (any status but 200, e.g. a proxy's 502),
 * a new EventSource starts after a backoff, with ?lastEventId=<last id>
 * in url (a view of your own should read both).
 *
 * connect(url, options) returns {close(), lastEventId, state}: the
 * last id seen and the state last given to onState.
 * Options, all optional:
 *   events: {type: fn(data, event)}, a handler per event type.
 *   onMessage: fn(data, event) for events of type "message".
 *   json: true, and handlers get JSON.parse(event.data); data that is
 *     not JSON goes to onError({status: 0, message, event}).
 *   onOpen: fn(event), a stream opened, first or again.
 *   onState: fn(state, delay), state is "connecting", "open",
 *     "reconnecting" or "closed" (for good); delay is the ms until a
 *     new EventSource, when the browser gave up.
 *   onReset: fn(event), events after the id in event.data are lost.
 *   onError: fn({status, message}) for eventstream.error; a 4xx status
 *     closes for good, any other is retried.
 *   onEnd: fn(event), the server finished; closed for good.
 *   lastEventId: resume after this id.
 *   minDelay, maxDelay: the first new EventSource waits minDelay ms
 *     (1000), each next one twice as long up to maxDelay (30000),
 *     jittered to 50-100% of that.
 *   withCredentials: passed on to EventSource.
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

  function start() {
    const target = new URL(url, location.href);
    if (handle.lastEventId) target.searchParams.set("lastEventId", handle.lastEventId);
    source = new EventSource(target, {withCredentials: o.withCredentials});
    source.onopen = (event) => {
      failures = 0;
      setState("open");
      o.onOpen?.(event);
    };
    source.onerror = () => {
      // Only an EventSource that gave up needs replacing.
      if (source.readyState !== EventSource.CLOSED) return setState("reconnecting");
      const ceiling = Math.min(o.maxDelay ?? 30000, (o.minDelay ?? 1000) * 2 ** failures++);
      // Jittered, so that pages do not all come back at once.
      const delay = Math.round((ceiling * (1 + Math.random())) / 2);
      timer = setTimeout(start, delay);
      setState("reconnecting", delay);
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
