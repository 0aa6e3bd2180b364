// Builds one example graph in the running ComfyUI web app, through the app's own LiteGraph API.
// Called by tools/build_workflows.py with a spec: {name, nodes: [{key, type, band, col, widgets, title, width,
// height, properties}], links: [[srcKey, outputName, dstKey, inputName]], groups: [{title, keys, color}]}.
// Nodes are stacked in columns (in spec order), columns in bands (rows of the layout); groups frame their nodes.
// The pictures that Load Image nodes name must be in the input folder: the layout is made once their previews
// have rendered, at the size the app gives a node to show its picture, so that opening the file shows it as saved.
async (spec) => {
  await app.extensionManager.command.execute('Comfy.NewBlankWorkflow')
  const graph = app.graph
  const byKey = {}
  const fail = (message) => {
    throw new Error(`${spec.name}: ${message}`)
  }

  for (const s of spec.nodes) {
    const node = LiteGraph.createNode(s.type)
    if (!node) fail(`node type ${s.type} is not registered (is the pack loaded?)`)
    graph.add(node)
    if (s.title) node.title = s.title
    for (const [name, value] of Object.entries(s.widgets)) {
      // MarkdownNote's only widget has no name; it is addressed as "".
      const widget = name === '' ? node.widgets?.[0] : node.widgets?.find((w) => w.name === name)
      if (!widget) fail(`${s.type} has no widget ${name} (has ${(node.widgets ?? []).map((w) => w.name)})`)
      widget.value = value
      widget.callback?.(value, app.canvas, node)
    }
    Object.assign(node.properties, s.properties)
    const [w, h] = node.computeSize()
    node.setSize([Math.max(s.width ?? 0, w, node.size[0]), Math.max(s.height ?? 0, h)])
    byKey[s.key] = node
  }

  // Wait for every picture preview, then for the app to finish growing those nodes around their pictures.
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)))
  const loading = Object.values(byKey).filter((n) => n.widgets?.some((w) => w.name === 'upload'))
  const rendered = (n) => n.imgs?.length && n.imgs.every((img) => img.complete && img.naturalWidth > 0)
  for (const deadline = Date.now() + 30000; loading.some((n) => !rendered(n)); await frame()) {
    if (Date.now() > deadline) {
      const missing = loading.filter((n) => !rendered(n)).map((n) => n.widgets.find((w) => w.name === 'image')?.value)
      fail(`no preview of ${missing.join(', ')}: put the picture(s) into the server's input folder`)
    }
    graph.setDirtyCanvas(true, true)
  }
  for (let previous = '', i = 0; i < 50; i++) {
    graph.setDirtyCanvas(true, true)
    await frame()
    const sizes = JSON.stringify(Object.values(byKey).map((n) => n.size))
    if (sizes === previous) break
    previous = sizes
    await new Promise((resolve) => setTimeout(resolve, 200))
  }

  for (const [srcKey, outName, dstKey, inName] of spec.links) {
    const src = byKey[srcKey]
    const dst = byKey[dstKey]
    const out = src.outputs.findIndex((o) => o.name === outName)
    const inp = dst.inputs.findIndex((i) => i.name === inName)
    if (out < 0) fail(`${src.type} has no output ${outName} (has ${src.outputs.map((o) => o.name)})`)
    if (inp < 0) fail(`${dst.type} has no input ${inName} (has ${dst.inputs.map((i) => i.name)})`)
    if (!src.connect(out, dst, inp)) fail(`the app refused the link ${srcKey}.${outName} -> ${dstKey}.${inName}`)
  }

  // Layout: bands top to bottom; in each band, columns left to right, each as wide as its widest node, nodes
  // stacked with room for their title bars and for a group title above the first row.
  const title = LiteGraph.NODE_TITLE_HEIGHT
  const gapX = 70
  const gapY = 30
  const groupTitle = 50
  const bands = new Map()
  for (const s of spec.nodes) {
    const band = s.band ?? 0
    if (!bands.has(band)) bands.set(band, new Map())
    const columns = bands.get(band)
    if (!columns.has(s.col)) columns.set(s.col, [])
    columns.get(s.col).push(byKey[s.key])
  }
  let top = 0
  for (const band of [...bands.keys()].sort((a, b) => a - b)) {
    const columns = bands.get(band)
    let x = 0
    let bottom = top
    for (const col of [...columns.keys()].sort((a, b) => a - b)) {
      const nodes = columns.get(col)
      let y = top + groupTitle + title
      for (const node of nodes) {
        node.pos = [x, y]
        y += node.size[1] + title + gapY
      }
      bottom = Math.max(bottom, y)
      x += Math.max(...nodes.map((n) => n.size[0])) + gapX
    }
    top = bottom + 40
  }

  // Group frames from the nodes' own bounds (a node's cached bounding box is only refreshed when drawn).
  const pad = 20
  for (const g of spec.groups) {
    const nodes = g.keys.map((k) => byKey[k] ?? fail(`group ${g.title} names unknown node ${k}`))
    const x0 = Math.min(...nodes.map((n) => n.pos[0])) - pad
    const y0 = Math.min(...nodes.map((n) => n.pos[1] - title)) - pad - groupTitle + 10
    const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + pad
    const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + pad
    const group = new LGraphGroup(g.title)
    group.color = g.color
    group.font_size = 28
    group.pos = [x0, y0]
    group.size = [x1 - x0, y1 - y0]
    graph.add(group)
  }

  graph.setDirtyCanvas(true, true)
  await app.extensionManager.command.execute('Comfy.Canvas.FitView')
  return Object.fromEntries(Object.entries(byKey).map(([k, n]) => [k, n.id]))
}
