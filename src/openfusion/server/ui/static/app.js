// openfusion trace viewer: plain JavaScript modules over the runs API, no framework, no build
// step. Two views on one page: the run list (/ui) and a run (/ui/runs/{id}).

import { showWho } from "./common.js";
import { listView } from "./list.js";
import { runView } from "./run.js";

const root = document.getElementById("app");
showWho();
const match = location.pathname.match(/^\/ui\/runs\/(.+)$/);
if (match) runView(root, decodeURIComponent(match[1]));
else listView(root);
