// The RTCRtpScriptTransform worker: SFrame on every sender and receiver of the call,
// off the page's main thread. The page posts the gateway's key messages here and gets
// the counters back four times a second (never any key bytes).

import { FrameCrypto } from './sframe.js';

const frames = new FrameCrypto();

self.onmessage = (event) => frames.handle(event.data);

self.onrtctransform = (event) => {
  const { side, kind } = event.transformer.options;
  event.transformer.readable
    .pipeThrough(frames.transform(side, kind))
    .pipeTo(event.transformer.writable)
    .catch((err) => console.error(`SFrame ${side} ${kind} transform stopped: ${err.name}`));
};

setInterval(() => self.postMessage({ type: 'stats', stats: { ...frames.stats } }), 250);

self.postMessage({ type: 'ready' });
